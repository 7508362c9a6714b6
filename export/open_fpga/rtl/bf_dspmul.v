// A lane's product p = a * b (both signed; the low PW bits) two clock cycles after a and b, with
// its registers inside an ECP5 DSP block: MULT18X18D with the A/B input registers and the output
// register in use (yosys maps a multiplication to the block combinationally and does not pack
// registers into it on the ECP5). BF_ECP5_DSP is defined where the flow synthesizes a DSP layer;
// elsewhere (simulation, LUT synthesis) the same two registers in logic.
module bf_dspmul #(parameter AW = 4, BW = 5, PW = 9) (
  input  wire clk,
  input  wire signed [AW-1:0] a,
  input  wire signed [BW-1:0] b,
  output wire [PW-1:0] p
);
`ifdef BF_ECP5_DSP
  wire [17:0] A = {{(18 - AW){a[AW-1]}}, a};
  wire [17:0] B = {{(18 - BW){b[BW-1]}}, b};
  wire [35:0] P;
  MULT18X18D #(.REG_INPUTA_CLK("CLK0"), .REG_INPUTB_CLK("CLK0"), .REG_OUTPUT_CLK("CLK0"),
               .REG_INPUTA_CE("CE0"), .REG_INPUTB_CE("CE0"), .REG_OUTPUT_CE("CE0"),
               .REG_INPUTA_RST("RST0"), .REG_INPUTB_RST("RST0"), .REG_OUTPUT_RST("RST0")) u (
    .A0(A[0]), .A1(A[1]), .A2(A[2]), .A3(A[3]), .A4(A[4]), .A5(A[5]), .A6(A[6]), .A7(A[7]), .A8(A[8]),
    .A9(A[9]), .A10(A[10]), .A11(A[11]), .A12(A[12]), .A13(A[13]), .A14(A[14]), .A15(A[15]), .A16(A[16]), .A17(A[17]),
    .B0(B[0]), .B1(B[1]), .B2(B[2]), .B3(B[3]), .B4(B[4]), .B5(B[5]), .B6(B[6]), .B7(B[7]), .B8(B[8]),
    .B9(B[9]), .B10(B[10]), .B11(B[11]), .B12(B[12]), .B13(B[13]), .B14(B[14]), .B15(B[15]), .B16(B[16]), .B17(B[17]),
    .C0(1'b0), .C1(1'b0), .C2(1'b0), .C3(1'b0), .C4(1'b0), .C5(1'b0), .C6(1'b0), .C7(1'b0), .C8(1'b0),
    .C9(1'b0), .C10(1'b0), .C11(1'b0), .C12(1'b0), .C13(1'b0), .C14(1'b0), .C15(1'b0), .C16(1'b0), .C17(1'b0),
    .SIGNEDA(1'b1), .SIGNEDB(1'b1), .SOURCEA(1'b0), .SOURCEB(1'b0),
    .CLK0(clk), .CE0(1'b1), .RST0(1'b0),
    .P0(P[0]), .P1(P[1]), .P2(P[2]), .P3(P[3]), .P4(P[4]), .P5(P[5]), .P6(P[6]), .P7(P[7]), .P8(P[8]),
    .P9(P[9]), .P10(P[10]), .P11(P[11]), .P12(P[12]), .P13(P[13]), .P14(P[14]), .P15(P[15]), .P16(P[16]), .P17(P[17]),
    .P18(P[18]), .P19(P[19]), .P20(P[20]), .P21(P[21]), .P22(P[22]), .P23(P[23]), .P24(P[24]), .P25(P[25]), .P26(P[26]),
    .P27(P[27]), .P28(P[28]), .P29(P[29]), .P30(P[30]), .P31(P[31]), .P32(P[32]), .P33(P[33]), .P34(P[34]), .P35(P[35]));
  assign p = P[PW-1:0];
`else
  reg signed [AW-1:0] ar;
  reg signed [BW-1:0] br;
  reg [PW-1:0] pr;
  always @(posedge clk) begin ar <= a; br <= b; pr <= ar * br; end
  assign p = pr;
`endif
endmodule
