// bitfold max-pool unit (Verilog-2005): K x K windows with stride K, no padding, on unsigned
// BITS-bit codes (a monotonic activation commutes with max, so pooling codes is exact).
// LOAD the whole IH x IW x CH map, then for every output pixel and channel read its K*K
// elements (one per cycle) and EMIT the maximum. Stream order is pixel-major (H, W, C).
module bf_pool #(
  parameter IH = 2, IW = 2, CH = 1, K = 2, BITS = 2
) (
  input  wire clk,
  input  wire rst,
  input  wire in_valid,
  output wire in_ready,
  input  wire [BITS-1:0] in_data,
  output wire out_valid,
  input  wire out_ready,
  output wire [BITS-1:0] out_data
);
  localparam OH = IH / K, OW = IW / K, N = IH * IW * CH;
  localparam S_LOAD = 2'd0, S_COMP = 2'd1, S_WAIT = 2'd2, S_EMIT = 2'd3;
  reg [BITS-1:0] mem [0:N-1];
  reg [1:0] state;
  localparam CW = $clog2(N + 1) + 1;
  reg [CW-1:0] waddr, oy, ox, c, ky, kx;
  wire [CW+1:0] raddr = ((oy * K + ky) * IW + ox * K + kx) * CH + c;
  wire last_k = (ky == K - 1) && (kx == K - 1);
  reg [BITS-1:0] rd, m;
  reg vA, firstA, lastA, done;
  assign in_ready = (state == S_LOAD);
  assign out_valid = (state == S_EMIT);
  assign out_data = m;

  always @(posedge clk) begin
    rd <= mem[raddr];
    vA <= (state == S_COMP);
    firstA <= (ky == 0) && (kx == 0);
    lastA <= last_k;
    done <= 1'b0;
    if (vA) begin
      m <= (firstA || rd > m) ? rd : m;
      done <= lastA;
    end
    if (rst) begin
      state <= S_LOAD; waddr <= 0; oy <= 0; ox <= 0; c <= 0; ky <= 0; kx <= 0;
      vA <= 1'b0; done <= 1'b0;
    end else begin
      case (state)
        S_LOAD: if (in_valid) begin
          mem[waddr] <= in_data;
          if (waddr == N - 1) begin waddr <= 0; state <= S_COMP; end
          else waddr <= waddr + 1;
        end
        S_COMP: begin
          if (last_k) begin ky <= 0; kx <= 0; state <= S_WAIT; end
          else if (kx == K - 1) begin kx <= 0; ky <= ky + 1; end
          else kx <= kx + 1;
        end
        S_WAIT: if (done) state <= S_EMIT;
        S_EMIT: if (out_ready) begin
          state <= S_COMP;
          if (c == CH - 1) begin
            c <= 0;
            if (ox == OW - 1) begin
              ox <= 0;
              if (oy == OH - 1) begin oy <= 0; state <= S_LOAD; end
              else oy <= oy + 1;
            end else ox <= ox + 1;
          end else c <= c + 1;
        end
      endcase
    end
  end
endmodule
